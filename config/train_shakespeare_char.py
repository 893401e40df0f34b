# train a miniature character-level shakespeare model
# (python data/shakespeare_char/prepare.py first)

out_dir = 'out-shakespeare-char'
eval_interval = 250  # often, because this small dataset is easy to overfit
eval_iters = 200
log_interval = 10

# overfitting is expected here, so keep only the checkpoint with the best val loss
always_save_checkpoint = False

wandb_log = False  # --wandb_log=True to turn on
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # up to 256 characters of context

# baby GPT
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a baby network tolerates a higher rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # few tokens per iteration: average the second moment over longer

warmup_iters = 100

# on a laptop without a GPU also add
# device = 'cpu'
