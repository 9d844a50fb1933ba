# keel_layer(NAME SOURCES ... [PUBLIC_DEPS ...] [PRIVATE_DEPS ...] [TESTS ...] [TEST_DEPS ...])
#
# Defines one layer of keel as a static library `keel_<NAME>`, whose public headers live
# in `include/keel/<NAME>/` beside its sources. TESTS are `*_test.cc` files compiled into
# one GoogleTest binary `keel_<NAME>_test`, registered with CTest under the label "unit".
# Every layer goes through this one function so that none drifts.
function(keel_layer NAME)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_DEPS;PRIVATE_DEPS;TESTS;TEST_DEPS" ${ARGN})
  set(target keel_${NAME})
  add_library(${target} STATIC ${ARG_SOURCES})
  target_include_directories(${target} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                       PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(${target} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  if(KEEL_BUILD_TESTS AND ARG_TESTS)
    add_executable(${target}_test ${ARG_TESTS})
    target_include_directories(${target}_test PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
    target_link_libraries(${target}_test PRIVATE ${target} ${ARG_PRIVATE_DEPS} ${ARG_TEST_DEPS}
                          keel_test_support GTest::gmock GTest::gtest_main)
    gtest_discover_tests(${target}_test PROPERTIES LABELS unit DISCOVERY_TIMEOUT 30)
  endif()
endfunction()
