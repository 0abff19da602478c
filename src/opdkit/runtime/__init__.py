"""The shared runtime layer under every command (train, eval, diagnose, bench, demo).

* :mod:`~opdkit.runtime.models`: model and tokenizer loading; ``auto`` device and dtype; EOS ids.
* :mod:`~opdkit.runtime.prompts`: prompt templates and the one chat-template setting.
* :mod:`~opdkit.runtime.problems`: the :class:`Problem` record and its file / dataset loaders.
* :mod:`~opdkit.runtime.benchmarks`: named problem sets (math files in the data directory, ``chainK``).
* :mod:`~opdkit.runtime.graders`: the grader registry and the rewards derived from it.
* :mod:`~opdkit.runtime.settings`: the shared model / sampling / prompt settings with help and validation.

It imports the math packages and :mod:`opdkit.rollout`, never ``train``, ``eval``, ``diagnose``,
``demo`` or ``cli``.
"""
