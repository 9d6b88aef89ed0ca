"""Stable Diffusion components: loading, the tiny configs, export."""
