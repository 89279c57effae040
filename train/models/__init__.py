"""The networks a task trains or conditions on: backbones, conditioners, frozen parts."""
