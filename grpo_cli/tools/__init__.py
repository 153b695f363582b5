"""Tool-integrated rollouts: environments that answer the model between its turns.

``base`` holds the contracts (the text format of tool calls, :class:`Environment`, the token-level
:class:`Turns` an engine drives); ``environments`` the registry (``rollout.tools``,
``rollout.environment``) and the adapter from an environment to ``Turns``; ``python`` the sandbox
that runs model-written code.
"""
