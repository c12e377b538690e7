"""Small scripted versions of the papers' claims: MoE vs dense, proxy-tuning, WARM, checkpoint averaging."""
