"""Write small image files and class-folder trees the way the real datasets lay them out."""

from pathlib import Path

from PIL import Image


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30),
                mode: str = "RGB") -> Path:
    """A solid-colour image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    (image.convert(mode) if mode != "RGB" else image).save(path)
    return path


def color_of(label: int) -> tuple[int, int, int]:
    """A colour that identifies a class, so tests can check labels against pixels."""
    return (20 * label + 10, 200 - 15 * label, (70 * label) % 256)


def write_class_folders(folder: Path, classes: list[str], per_class: int, suffix: str = ".png",
                        size: tuple[int, int] = (40, 30)) -> None:
    """folder/<class>/<i><suffix>, each image the solid colour of its class's position."""
    for label, name in enumerate(classes):
        for i in range(per_class):
            write_image(folder / name / f"{i}{suffix}", color_of(label), size)
