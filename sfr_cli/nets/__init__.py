"""Pure face-render networks (SadTalker's facevid2vid-style renderer) and their tensor math.

Attribute names follow SadTalker's modules exactly: the attribute path is the checkpoint format.
"""
