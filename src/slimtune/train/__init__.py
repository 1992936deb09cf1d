"""Fine-tuning: adapters (any method registered in :mod:`slimtune.adapt`) or full fine-tuning,
on causal-LM text (austen, ptb) or sequence classification (finefoods). See :mod:`.loop`."""
from slimtune.train.classifier import SequenceClassifier
from slimtune.train.config import TrainConfig, make_train_config
from slimtune.train import distributed
from slimtune.train.loop import accumulate_gradients, check_resume, optimizer_step, train
from slimtune.train.schedule import WarmupCosine, warmup_cosine
from slimtune.train.state import is_finished, latest_checkpoint
from slimtune.train.tasks import CausalLMTask, ClassificationTask, build_task

__all__ = ["CausalLMTask", "ClassificationTask", "SequenceClassifier", "TrainConfig",
           "WarmupCosine", "accumulate_gradients", "build_task", "check_resume", "distributed",
           "is_finished",
           "latest_checkpoint", "make_train_config", "optimizer_step", "train", "warmup_cosine"]
