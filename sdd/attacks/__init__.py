"""Attacks on a (defended) model that are not plain harmful fine-tuning of ``sdd.modules``.

Every ``conf/attack/`` entry declares ``attack_kind``:

- ``fine_tuning``: ``sdd.training.train`` on the attack's data (MFT, BFT, jailbreak-tuning);
- ``weight_edit``: a procedure that edits the weights and saves a transformers folder (refusal-direction
  ablation);
- ``evaluation``: applied while the evaluation generates (prefilling, embedding-space suffixes); it adds
  variants to the evaluation of the attacked model (``eval_attacks``).
"""
