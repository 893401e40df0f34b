# evaluate the pretrained gpt2-medium: 350M parameters, n_layer=24, n_head=16, n_embd=1024
exec(open('config/eval_gpt2.py').read())
init_from = 'gpt2-medium'
