"""LoRA / LoCon adapters with peft, and their files in kohya's and diffusers' formats.

- `lora.settings`: `LoraSettings` from the ``lora_*`` keys of train.json;
- `lora.targets`: which modules get adapters (kohya's ``networks.lora`` module set);
- `lora.inject`: `add_lora_adapters`, putting peft's adapters into the models that train;
- `lora.adapters`: finding the adapters, their weights, their exact state for resuming;
- `lora.kohya`, `lora.files`: kohya's and diffusers' files, each read back and checked;
- `lora.reading`: ``lora_init``, reading either format into the run's adapters;
- `lora.merge`: the base model with the adapters merged (``lora_merge``);
- `lora.report`: adapter counts and the kohya file's size.

Nothing is imported here, so ``import lora.settings`` stays light.
"""
