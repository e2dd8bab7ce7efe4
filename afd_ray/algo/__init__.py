"""Pure torch math of afd_ray: losses, KL estimators, advantages, pair and Best-of-N selection.

Nothing here imports Ray, vLLM or DeepSpeed; every function is tested against hand-derived numbers.
Shape suffixes: B batch, T tokens, V vocabulary, P prompts, N (or G) samples per prompt, C preference pairs.
"""
