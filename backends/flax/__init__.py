"""The Flax NNX lowering of ``llm.spec.ModelSpec``, written to ``docs/architecture.md``.

``model.py`` holds the modules (same class and attribute names as ``backends/torch``);
``convert.py`` is the only place that moves weights between canonical dicts and NNX state.
This package never imports torch.
"""
