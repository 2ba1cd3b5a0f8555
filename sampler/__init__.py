"""DeRaDiff sampling: the mixing math (``mixing``, no ComfyUI imports) and the
ComfyUI integration (``pair``, ``guider``, ``sampling``)."""
