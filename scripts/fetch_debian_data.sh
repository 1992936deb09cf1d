#!/usr/bin/env bash
# Fetch the Debian data packages (Jane Austen novels, fine-food reviews, Fashion-MNIST) and unpack
# them under ~/.cache/slimtune/debian without installing R: `apt-get download` + `dpkg -x`.
# Already-installed system copies (/usr/lib/R/site-library, /usr/share/datasets) are used as they are.
set -euo pipefail
root="${SLIMTUNE_DEBIAN_ROOT:-$HOME/.cache/slimtune/debian}"
pkgs=(r-cran-janeaustenr r-cran-modeldata dataset-fashion-mnist)
mkdir -p "$root/debs"
cd "$root/debs"
missing=()
for p in "${pkgs[@]}"; do ls "$p"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if ! apt-get download "${missing[@]}" 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq || true; fi
    apt-get download "${missing[@]}" || {
      echo "error: could not fetch ${missing[*]} with apt-get download; install them with apt-get" >&2
      exit 1; }
  fi
fi
for deb in *.deb; do dpkg -x "$deb" "$root"; done
touch "$root/.fetched"
echo "data packages unpacked under $root"
