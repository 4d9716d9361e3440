"""straggler.collector"""
