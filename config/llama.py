# Llama's architecture, after a training config (export.py --format=hf writes a LlamaForCausalLM):
# $ python train.py config/train_shakespeare_char.py config/llama.py
rope = True
norm = 'rmsnorm'  # with a weight
activation = 'swiglu'
tie_lm_head = False
bias = False
n_kv_head = 0  # grouped-query attention: fewer key/value heads than n_head; 0: as many
