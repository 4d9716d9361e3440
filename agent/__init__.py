"""straggler.agent"""
