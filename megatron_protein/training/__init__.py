"""Pretraining pieces: flags -> configs (arguments), optimizer and LR schedule, checkpoints (Megatron layout),
data order (pretrain_data), logging, and the loop (train_loop.pretrain)."""
