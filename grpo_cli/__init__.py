"""grpo_cli: the DeepSeekMath "unified paradigm" of RL fine-tuning, one trainer for every method.

Shape notation, used in every docstring and comment of the package:

    B  batch of sequences (prompts x completions)      G  group size (completions per prompt)
    P  number of prompts                                T  tokens of a sequence (prompt + completion)
    V  vocabulary size                                  H  hidden size
    N  tokens flattened over a batch (N = B * T)        K  reasoning steps of one completion
"""

__version__ = "0.1.0"
