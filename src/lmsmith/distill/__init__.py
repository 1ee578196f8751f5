"""Knowledge distillation: SWITCH and the methods it is compared with."""
