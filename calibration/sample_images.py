"""Images that ship with scikit-image, with a prompt and a short description each: the offline image set.

They serve as the `sample-images` calibration source and as the image prompts of evaluation, so a machine with
no hub access still calibrates and evaluates the vision path on real photographs. Only images stored inside the
scikit-image wheel are listed (several `skimage.data` images download on first use and are left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
from PIL import Image


@dataclass(frozen=True)
class SampleImage:
    name: str  # the skimage.data function
    prompt: str
    description: str

    def load(self) -> Image.Image:
        from skimage import data

        loaded = getattr(data, self.name)()
        # stereo_motorcycle gives (left, right, disparity): the left view is the photograph.
        array = numpy.asarray(loaded[0] if isinstance(loaded, tuple) else loaded)
        image = Image.fromarray(array)
        return image.convert("RGB")


SAMPLE_IMAGES: tuple[SampleImage, ...] = (
    SampleImage(
        "astronaut",
        "Who is in this photo and what are they wearing?",
        "A smiling astronaut in an orange spacesuit, with a helmet, a flag and a shuttle model.",
    ),
    SampleImage("chelsea", "What animal is this?", "A close-up of a tabby cat with green eyes."),
    SampleImage(
        "coffee", "What is on the table?", "A red cup of coffee on a red saucer with a spoon, on a wooden table."
    ),
    SampleImage("rocket", "Describe the scene.", "A rocket stands on its launch pad at dusk, among floodlit towers."),
    SampleImage("stereo_motorcycle", "What vehicle is shown?", "A red motorcycle is parked in a workshop."),
    SampleImage("coins", "How many coins are there?", "Twenty-four old coins lie in rows on a dark background."),
    SampleImage(
        "camera", "What is the person doing?", "A man in a dark coat looks through a camera on a tripod in a field."
    ),
    SampleImage("moon", "What does this image show?", "Grey lunar surface with a few craters."),
    SampleImage("horse", "What shape is this?", "The black silhouette of a horse on a white background."),
    SampleImage("hubble_deep_field", "What can be seen here?", "Hundreds of distant galaxies on a black sky."),
    SampleImage("page", "What is this?", "A scanned book page headed Region-based segmentation, with a line of code."),
    SampleImage("retina", "What kind of image is this?", "A colour photograph of the back of a human eye."),
    SampleImage(
        "immunohistochemistry", "What does this slide show?", "Tissue stained brown and blue, seen under a microscope."
    ),
    SampleImage("logo", "What does this picture show?", "An orange and green logo with a snake in its middle."),
    SampleImage("clock", "What object is this?", "A blurred photograph of a round clock face."),
    SampleImage("text", "What is on this paper?", "Handwritten mathematical notes on paper, seen at an angle."),
)
