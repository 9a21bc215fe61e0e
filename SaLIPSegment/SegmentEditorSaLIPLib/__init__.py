"""The SaLIP Segment Editor effect, in its own folder as Slicer's scripted-effect template keeps it.

Slicer loads an effect file under its folder's name (`SegmentEditorSaLIPLib`), replacing
whatever `sys.modules` held under that name; a folder of its own keeps that name apart from
the engine package `SaLIPSegmentLib`. Importing this package gives the same class.
"""

from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import *  # noqa: F401,F403

from .SegmentEditorEffect import *  # noqa: F401,F403
