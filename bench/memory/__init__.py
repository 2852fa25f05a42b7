"""Memory and sharding measurements of whole training steps: the HF integration against
materialised logits (``hf_memory``), memory per process under each sharding wrapper
(``sharded_memory``), and FSDP2 steps against the same step unsharded (``fsdp_step``)."""
