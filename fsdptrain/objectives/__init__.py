"""What a training step optimises: the objective seam (base.py) and its members, with the token
cross-entropy (full or chunked through lm_head) they are computed from."""
