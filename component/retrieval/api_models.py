"""The JSON API's request and response bodies, validated by pydantic (FastAPI turns a failure into 422).

Images travel inside JSON as base64 strings (standard alphabet, padding optional, no data: URL
prefix), so that one request can carry several images beside texts and the whole body is
validated before anything is decoded. `POST /api/search_image` takes the image file itself as
the body instead, as the page sends it.
"""

import base64
import binascii
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from component.encoding import Mode

MAX_TEXTS = 256  # per request
MAX_TEXT_CHARS = 2_000  # longer texts are truncated to the tokens the model takes anyway
MAX_IMAGES = 16  # per request; each decoded only after the whole request is validated
MAX_TOP_K = 100
DEFAULT_TOP_K = 12


def decode_base64(value: str) -> bytes:
    """The bytes of a base64 string; ValueError (pydantic's 422) when it is not base64."""
    try:
        data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a base64 string (send the image file's bytes in standard base64)") from None
    if not data:
        raise ValueError("an empty image")
    return data


QueryText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Base64Image = Annotated[str, Field(min_length=1), AfterValidator(decode_base64)]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K)]


class StrictBody(BaseModel):
    """A request body that refuses unknown keys: a misspelt key must not be ignored."""

    model_config = ConfigDict(extra="forbid")


class EmbedRequest(StrictBody):
    """Texts and/or images to encode."""

    texts: list[QueryText] = Field(default_factory=list, max_length=MAX_TEXTS)
    images: list[Base64Image] = Field(
        default_factory=list, max_length=MAX_IMAGES, description="image files, base64-encoded"
    )

    @model_validator(mode="after")
    def some_inputs(self) -> "EmbedRequest":
        if not (self.texts or self.images):
            raise ValueError("nothing to embed: give texts and/or images")
        return self


class EmbedResponse(BaseModel):
    """L2-normalised embeddings, one row per input, in the order given."""

    dim: int
    backend: Literal["torch", "onnx"]
    text_embeds: list[list[float]]
    image_embeds: list[list[float]]


class SimilarityRequest(StrictBody):
    """Inputs to score, as predict_similarity.py scores them."""

    texts: list[QueryText] = Field(default_factory=list, max_length=MAX_TEXTS)
    images: list[Base64Image] = Field(
        default_factory=list, max_length=MAX_IMAGES, description="image files, base64-encoded"
    )
    mode: Mode | None = Field(
        None,
        description="image-text: images are the queries, texts the candidates; text-text and "
        "image-image: every input against every other. Default: image-text when both kinds are "
        "given, otherwise whichever kind there is",
    )
    top_k: TopK = 5


class SimilarityResponse(BaseModel):
    """predict_similarity.py's JSON: images are named "image 0", "image 1", ... in the order sent."""

    mode: Mode
    probability: Literal["softmax", "sigmoid"] = Field(
        description="softmax over each query's candidates (CLIP models), or sigmoid match "
        "probability of each pair (SigLIP models, which have a logit bias)"
    )
    queries: list[str]
    candidates: list[str]
    cosine: list[list[float]]
    probs: list[list[float]]
    top_k: list[list[int]]


class SearchResultItem(BaseModel):
    """One indexed image found by a search."""

    filename: str
    score: float = Field(description="cosine similarity with the query")
    text: str | None = Field(None, description="the CSV caption, for an index built from a CSV")
    probability: float | None = Field(
        None, description="SigLIP models only: sigmoid(cosine * exp(logit_scale) + logit_bias)"
    )


class SearchResponse(BaseModel):
    """The query and its ranked results, best first (as `retrieval.py search --json`)."""

    query: str
    results: list[SearchResultItem]


class Health(BaseModel):
    """What the service is serving."""

    status: Literal["ok"]
    images: int
    generation: int
    backend: Literal["torch", "onnx"]
    probability: Literal["softmax", "sigmoid"]


class ErrorBody(BaseModel):
    """Every 4xx answer: why the request was refused."""

    error: str
