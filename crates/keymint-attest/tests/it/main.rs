mod self_test;
