"""Training: vision-encoder pre-training, next-token (pre-)training on image-text and chat data, and RL with
outcome rewards.

    from step3vl.train import Pretrainer, PretrainConfig, RLTrainer, RLConfig, RLPrompt
"""

from step3vl.train.data import IGNORE, PackedBatch, TrainExample, chat_example, load_examples, pack, text_example
from step3vl.train.optim import OptimConfig
from step3vl.train.pretrain import PretrainConfig, Pretrainer, StepLog
from step3vl.train.rewards import math_reward
from step3vl.train.rl import RLConfig, RLPrompt, RLStepLog, RLTrainer
from step3vl.train.vision import VisionPretrainConfig, VisionPretrainer, VisionStepLog

__all__ = ["IGNORE", "OptimConfig", "PackedBatch", "PretrainConfig", "Pretrainer", "RLConfig", "RLPrompt", "RLStepLog",
           "RLTrainer", "StepLog", "TrainExample", "chat_example", "load_examples", "math_reward", "pack",
           "text_example", "VisionPretrainConfig", "VisionPretrainer", "VisionStepLog"]
