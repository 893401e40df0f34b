# finetune GPT-2 XL on data/shakespeare (its prepare.py first)
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2
always_save_checkpoint = False  # only save checkpoints that improve val loss

# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter: an epoch (301,966) is ~9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5
decay_lr = False
