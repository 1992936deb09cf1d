"""Writing models and adapters in other tools' formats: PEFT LoRA adapters (:mod:`.peft`)."""
