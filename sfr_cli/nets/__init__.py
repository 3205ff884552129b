"""Pure face-render networks (SadTalker's facevid2vid-style renderer), the face enhancer's networks (GFPGAN,
its StyleGAN2 decoder, ParseNet) and their tensor math.

Attribute names follow SadTalker's, gfpgan's and facexlib's modules exactly: the attribute path is the
checkpoint format.
"""
