"""`mmtool eval-transfer`: does pretraining on a mixture transfer to new tasks better than scratch?

    RUN (checkpoint) ──▶ model, and the same architecture freshly initialised (the scratch baseline)
    --task ──▶ tasks.py: labelled samples of only the --modalities (by default only rows pretraining
               never read), a seeded stratified split, laid out in the checkpoint's own streams
    --protocol ──▶ protocols.py: linear probe, fine-tune, k-shot, zero-shot; each run on both models
    report ──▶ evaluate.py: per task × protocol pretrained, scratch, gain (pretrained − scratch) with
               95% bootstrap intervals (mmtool.stats), verdict, ratios; data-efficiency curves;
               report.json (atomic) and one PNG per task (plots.py)
"""

from mmtool.transfer.evaluate import TransferConfig, evaluate_transfer

__all__ = ["TransferConfig", "evaluate_transfer"]
