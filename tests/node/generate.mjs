// client.images.generate(IMAGEGEN_PARAMS): prints the answer and the request id the SDK saw.
import { makeClient, params, run } from "./common.mjs";

run(async () => {
  const client = makeClient();
  const { data, response } = await client.images.generate(params()).withResponse();
  return {
    answer: data,
    requestID: data._request_id ?? null,
    contentType: response.headers.get("content-type"),
  };
});
