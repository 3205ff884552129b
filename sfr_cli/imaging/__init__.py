"""Image operations beside the nets: exact torch ports of the OpenCV calls SadTalker, facexlib and
RealESRGANer make (resizes, affine warps, LMeDS similarity, seamless clone), and the search for a crop's box.
They know tensors, like nets/, but hold no weights: `resize`, `face_align`, `face_blend`, `seamless_clone`,
`box_search`."""
