"""Evaluation of trained checkpoints: held-out loss by position (paper Figure 10) and S-NIAH-1 passkey."""
