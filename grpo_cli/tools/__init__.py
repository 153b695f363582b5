"""Tool-integrated rollouts: environments that answer the model between its turns.

``base`` holds the contracts (the text format of tool calls, :class:`Environment`, the token-level
:class:`Turns` an engine drives); ``python`` the sandbox that runs model-written code.
"""
