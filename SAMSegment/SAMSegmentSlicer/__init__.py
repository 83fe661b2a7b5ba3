"""The Slicer side of SAMSegment that does not need Qt.

Everything that decides something (which slice a view shows, where a point lands in voxel space,
which voxels a mask writes, what a click means, what to install) lives here so that it runs, and is
tested, on the headless ``slicer-core`` MRML. ``SAMSegment.py`` and the Segment Editor effect
(``SegmentEditorSAMLib/SegmentEditorEffect.py``, outside this package because Slicer loads an
effect file as a module named after its folder) only forward GUI events to these classes. Modules
here import ``slicer`` and ``vtk`` but never ``qt`` or ``ctk``.
"""
