"""EleutherAI's lm-evaluation-harness over dsft's runtime (extra ``[lmeval]``): the ``dsft`` lm-eval model
(:mod:`dsft.lmeval.model`), ``dsft eval --lm-eval`` (:mod:`dsft.lmeval.run`) and lm-eval's own command line
with that model registered (``python -m dsft.lmeval``). Nothing here is imported unless asked for: lm-eval
is optional."""
