"""Graph passes: matchers that recognise MoE code in Inductor's post-grad (and joint) FX graphs and rewrite
it into moe_ops ops (route_rewrite.py, experts_rewrite.py with one match_*.py per form of experts code,
joint_rewrite.py for training graphs). Imports nothing itself."""
