# evaluate the pretrained gpt2-medium: 350M parameters, n_layer=24, n_head=16, n_embd=1024
batch_size = 8
eval_iters = 500  # a better estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-medium'
