-- The data plane's request gate and evidence tap (Envoy's Lua filter, LuaJIT).
-- Requests: a POST to a model's :predict/:classify/:regress must carry one JSON object, nested
-- no deeper than MAX_DEPTH; anything else is answered 400 here and never reaches a replica.
-- Responses: the "predictions" array of a 200 is put in dynamic metadata (mlops.scores) for
-- the access log, which is what the canary judge and the shadow stage read. The request's
-- "instances" array goes there too (mlops.instances), for the serving log monitoring reads.
local MAX_DEPTH = 64
local MAX_SCORE_BYTES = 16384
local MAX_INSTANCE_BYTES = 16384
local LITERALS = { "true", "false", "null", "NaN", "Infinity" }

local function skip(s, i)
  return (string.find(s, "[^ \t\r\n]", i)) or (#s + 1)
end

local function parse_string(s, i)
  local j = i + 1
  while true do
    local k = string.find(s, '["\\%z\1-\31]', j)
    if not k then return nil, "unterminated string" end
    local c = string.sub(s, k, k)
    if c == '"' then return k + 1 end
    if c ~= "\\" then return nil, "control character in a string" end
    local e = string.sub(s, k + 1, k + 1)
    if e == "u" then
      if not string.find(s, "^%x%x%x%x", k + 2) then return nil, "bad \\u escape" end
      j = k + 6
    elseif string.find(e, '^["\\/bfnrt]') then
      j = k + 2
    else
      return nil, "bad escape in a string"
    end
  end
end

local function parse_number(s, i)
  local j = i
  if string.sub(s, j, j) == "-" then j = j + 1 end
  local a, b = string.find(s, "^%d+", j)
  if not a then return nil, "bad number" end
  if string.sub(s, a, a) == "0" and b > a then return nil, "number with a leading zero" end
  j = b + 1
  if string.sub(s, j, j) == "." then
    a, b = string.find(s, "^%d+", j + 1)
    if not a then return nil, "bad number" end
    j = b + 1
  end
  local e = string.sub(s, j, j)
  if e == "e" or e == "E" then
    a, b = string.find(s, "^[-+]?%d+", j + 1)
    if not a then return nil, "bad number" end
    j = b + 1
  end
  return j
end

local parse_value

local function parse_container(s, i, depth, open)
  if depth >= MAX_DEPTH then return nil, "nested deeper than " .. MAX_DEPTH .. " levels" end
  local close = (open == "{") and "}" or "]"
  i = skip(s, i + 1)
  if string.sub(s, i, i) == close then return i + 1 end
  while true do
    local err
    if open == "{" then
      if string.sub(s, i, i) ~= '"' then return nil, "expected a string key" end
      i, err = parse_string(s, i)
      if not i then return nil, err end
      i = skip(s, i)
      if string.sub(s, i, i) ~= ":" then return nil, "expected ':'" end
      i = i + 1
    end
    i, err = parse_value(s, i, depth + 1)
    if not i then return nil, err end
    i = skip(s, i)
    local d = string.sub(s, i, i)
    if d == close then return i + 1 end
    if d ~= "," then return nil, "expected ',' or '" .. close .. "'" end
    i = skip(s, i + 1)
  end
end

parse_value = function(s, i, depth)
  i = skip(s, i)
  if i > #s then return nil, "unexpected end of input" end
  local c = string.sub(s, i, i)
  if c == "{" or c == "[" then return parse_container(s, i, depth, c) end
  if c == '"' then return parse_string(s, i) end
  if string.sub(s, i, i + 8) == "-Infinity" then return i + 9 end
  if c == "-" or string.find(c, "^%d") then return parse_number(s, i) end
  for _, lit in ipairs(LITERALS) do
    if string.sub(s, i, i + #lit - 1) == lit then return i + #lit end
  end
  return nil, "unexpected character at offset " .. (i - 1)
end

-- nil when s is one JSON object (TF Serving's request body), else why not.
local function body_error(s)
  local i = skip(s, 1)
  if i > #s then return "empty request body" end
  if string.sub(s, i, i) ~= "{" then return "request body must be a JSON object" end
  local j, err = parse_value(s, i, 0)
  if not j then return err end
  if skip(s, j) <= #s then return "trailing characters after the JSON object" end
  return nil
end

local function is_model_call(path)
  return string.find(path, ":predict$") or string.find(path, ":classify$")
    or string.find(path, ":regress$")
end

function envoy_on_request(h)
  if h:headers():get(":method") ~= "POST" then return end
  local path = string.gsub(h:headers():get(":path") or "", "%?.*$", "")
  if not is_model_call(path) then return end
  local body = h:body()
  local text = body and body:getBytes(0, body:length()) or ""
  local err = body_error(text)
  if err then
    local msg = string.gsub(err, '["\\]', "")
    h:respond({ [":status"] = "400", ["content-type"] = "application/json" },
      '{"error": "JSON Parse error: ' .. msg .. ' (rejected by the data plane)"}')
    return
  end
  h:streamInfo():dynamicMetadata():set("mlops", "call", "1")
  if #text <= MAX_INSTANCE_BYTES then
    local inst = string.match(text, '"instances"%s*:%s*(%b[])')
    if inst then h:streamInfo():dynamicMetadata():set("mlops", "instances", inst) end
  end
end

function envoy_on_response(h)
  local meta = h:streamInfo():dynamicMetadata():get("mlops")
  if not meta or meta["call"] ~= "1" or h:headers():get(":status") ~= "200" then return end
  local body = h:body()
  if not body or body:length() > MAX_SCORE_BYTES then return end
  local p = string.match(body:getBytes(0, body:length()), '"predictions"%s*:%s*(%b[])')
  if p then h:streamInfo():dynamicMetadata():set("mlops", "scores", p) end
end
