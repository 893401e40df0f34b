# train a miniature character-level shakespeare model (data/shakespeare_char/prepare.py first);
# on a laptop without a GPU also add --device=cpu

out_dir = 'out-shakespeare-char'
eval_interval = 250  # often: we'll overfit
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # only save when val improves

wandb_log = False  # --wandb_log=True to turn on
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # up to 256 characters of context

n_layer = 6  # baby GPT
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a baby network can take a higher one
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # few tokens per iteration: a longer second-moment average
warmup_iters = 100
