# GPT-2 (124M) on OpenWebText down to a loss of ~2.85 on one node of 8x A100 40GB
# (python data/openwebtext/prepare.py first); one process drives all local GPUs, many hosts: README
# $ python train.py config/train_gpt2.py

wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# ~0.5M tokens per iteration:
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600k iterations: 300B tokens
max_iters = 600000
lr_decay_iters = 600000

# evaluation
eval_interval = 1000
eval_iters = 200
log_interval = 10

# weight decay
weight_decay = 1e-1
