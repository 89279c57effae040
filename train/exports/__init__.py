"""Export formats besides diffusers' own folders: the files other tools (A1111, ComfyUI) load."""
