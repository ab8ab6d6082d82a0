"""The 5-point keypoint picture for InstantID-style ControlNets."""

import numpy as np

from consistentid_core.face.keypoints import POINT_COLOURS, STICK_DIMMING, draw_face_keypoints


def test_points_are_coloured_dots_and_sticks_join_them_to_the_nose():
    kps = np.array([[60, 80], [140, 80], [100, 120], [70, 160], [130, 160]], dtype=np.float32)
    picture = draw_face_keypoints(kps, 200, 240)
    assert picture.shape == (240, 200, 3) and picture.dtype == np.uint8
    for (x, y), colour in zip(kps.astype(int), POINT_COLOURS):
        assert tuple(picture[y, x]) == colour
    # halfway along the left-eye stick, away from the dots: the left eye's colour, dimmed
    x, y = 70, 88
    assert tuple(picture[y, x]) == tuple(int(c * STICK_DIMMING) for c in POINT_COLOURS[0])
    assert picture[5, 5].sum() == 0  # black elsewhere
