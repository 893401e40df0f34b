# finetune GPT-2 XL on tiny Shakespeare (python data/shakespeare/prepare.py first)
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2

# keep only checkpoints that improve val loss
always_save_checkpoint = False

# examples per iteration:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so one epoch is ~9.2 iterations
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# constant, small learning rate
learning_rate = 3e-5
decay_lr = False
