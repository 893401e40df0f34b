# evaluate the pretrained gpt2-large: 774M parameters, n_layer=36, n_head=20, n_embd=1280
batch_size = 8
eval_iters = 500  # a better estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-large'
