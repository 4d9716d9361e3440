"""straggler.probes"""
