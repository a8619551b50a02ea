"""Pure math of the alignment methods: torch and the standard library only.

Tensors in, tensors out. No I/O, no config objects, no Ray, no DeepSpeed, no vLLM.
"""
