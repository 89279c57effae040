"""Training objectives as pure tensor functions: DDPM and rectified flow."""
