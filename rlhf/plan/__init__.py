"""The memory plan: what each phase of a training stage holds per rank, estimated before launch."""
