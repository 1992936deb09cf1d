"""Reading and writing files: atomic writes (:mod:`.atomic`), model checkpoints with factored
layers (:mod:`.checkpoint`) and R lazy-load databases (:mod:`.rlazyload`)."""
