"""The data layer: synthetic shapes and images, image archives and folders, the data-set registry."""
