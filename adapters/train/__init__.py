"""The bundled training job: a readable PEFT LoRA fine-tune of the base model on a tenant's chat data."""
